"""kdctl.distill"""
