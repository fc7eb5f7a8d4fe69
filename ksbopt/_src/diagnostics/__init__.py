"""Charges, the monitor and its optimizer descriptions, recorder, profiles, plots."""
