"""What the gateway does for data subjects and tenants: audit chain keys, erasure,
export, deactivation.  The command line and the admin API call these; the
store does the reading and deleting."""
