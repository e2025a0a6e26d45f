"""kdctl.data"""
