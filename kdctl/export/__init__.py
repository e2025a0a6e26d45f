"""kdctl.export"""
