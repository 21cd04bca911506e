"""Cost accounting: a ledger of device time per stage, amortised over the experiments that share artifacts."""
