"""Tables and plots from run dirs."""
