"""glinthawk-jax: offline LLM inference that places attention where it pays."""
