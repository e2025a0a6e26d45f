"""kdctl.cli"""
