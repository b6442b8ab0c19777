"""User-facing errors: the CLI prints their message as one paragraph and exits 2, without a traceback."""


class UserError(Exception):
    """Bad input, missing file or asset: the message says what is wrong, where, and how to fix it."""


class AssetError(UserError):
    """A weights file is missing, unfetchable or has the wrong sha256."""
