"""Delivery: compose what goes on the wire and send it, retrying until done."""
