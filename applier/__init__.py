"""The device half of abflip: refresh TUF metadata, stream a verified image into the
inactive A/B slot, and flip systemd-boot with boot counting.

Imports nothing from ``builder`` and needs neither boto3 nor any mkfs tool.
"""
