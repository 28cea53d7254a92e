"""What a person sees: the text progress line (terminals, and until the widget panel)."""
