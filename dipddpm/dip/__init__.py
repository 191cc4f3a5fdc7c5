"""Deep Image Prior: degradations, fitting (one net or many at once), stopping rules."""
