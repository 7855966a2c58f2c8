"""The prompt set the offline job runs when no --input is given (so the README's command needs no file)."""

BUILTIN_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "The three laws of thermodynamics are",
    "A haiku about the sea:",
    "The quick brown fox",
    "In 1969, astronauts landed on",
    "To make a cup of tea, first",
    "The key idea behind attention in transformers is",
    "Here is a list of prime numbers: 2, 3, 5,",
    "Dear diary, today I learned",
    "The best way to learn a new language is",
    "SELECT name FROM users WHERE",
    "The mitochondria is",
    "Roses are red, violets are blue,",
    "Paged attention stores the KV cache in",
)


def builtin_requests() -> list[dict]:
  """The built-in prompts as JSONL-shaped records with ids builtin-0, builtin-1, ..."""
  return [{"id": f"builtin-{i}", "prompt": p} for i, p in enumerate(BUILTIN_PROMPTS)]
