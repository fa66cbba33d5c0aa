"""The instability zoo: stable and failing configurations trained through the real agent, and the rules scored on them."""
