"""Asterisk integration gateway: calling-plan licensing and prepaid billing in real time."""
