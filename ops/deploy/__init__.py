"""Deploy and roll back releases on Docker hosts, bare hosts and webhook targets."""
