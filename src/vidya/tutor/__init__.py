"""The Hindi study tutor: prompts as versioned data files, and the web page `vidya serve` serves
at `/`. The page talks to the server through the OpenAI API only."""
