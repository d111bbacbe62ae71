//! Hardware profiles (filled in by the foundation work).
