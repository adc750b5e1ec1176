"""Statistics over prompts: bootstrap intervals for shifts and scores."""
