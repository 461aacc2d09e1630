"""Development and test tooling, not used by the product path unless a config names
`builtin:tiny-llama` (see `tiny_llama`)."""
