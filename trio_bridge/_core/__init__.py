"""Pure, synchronous definitions both processes share: tools and their argument checks."""
