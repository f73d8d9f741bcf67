"""The data pipeline's user-facing error (printed by the CLI without a traceback)."""


class DataError(Exception):
    user_facing = True
