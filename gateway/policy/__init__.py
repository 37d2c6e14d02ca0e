"""Policies sysadmins edit: retention and subprocessor routing, validated as one set."""
