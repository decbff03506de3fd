"""The CLI's command modules; each registers its commands on the apps in ``_common``."""
