"""`make demo`: the whole pipeline a user runs at 7B, on the toy family, in minutes."""
