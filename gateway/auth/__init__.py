"""Mail authentication: DKIM keys and signatures (SPF, DMARC, ARC and SRS build on it)."""
