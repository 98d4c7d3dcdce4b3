"""How many tokens to draft per request and step, chosen from measured costs."""
