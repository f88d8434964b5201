"""`gateway`: the HTTP gateway (not part of this build yet; refused with a clear message)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("gateway: the gateway is not built in this version (only the registry, localnet, "
          "tokens and node agent are)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
