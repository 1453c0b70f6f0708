"""The toolstack: domains, xl.cfg, registry, scheduler, API."""
