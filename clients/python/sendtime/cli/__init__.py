"""The ``sendtime`` command line: client commands over the Python client.

    sendtime track "Product Added" --user u1 --properties '{"product_id": "p1", "price": 9.5}'
    sendtime track --event '{"userId": "u1", "event": "Signed Up"}'     # a whole event
    sendtime identify --user u1 --email ada@example.com --consent marketing=true --trait plan=pro
    sendtime profile u1 [--json]
    sendtime content u1 [--blocks cart,recommendations] [--deadline-ms 200] [--json]
    sendtime render abandoned_cart --user u1 [--out cart.html] [--text]
    sendtime preview abandoned_cart --user u1 --png cart.png [--mobile]
    sendtime demo-data                                  # a demo shopper to try these on
    sendtime send post_purchase --user u1 [--idempotency-key KEY] [--transactional] [--wait]
    sendtime deliveries [--user u1] [--flow abandoned_cart] [--limit N | --all] [--json]
    sendtime flows                                      # flows and their deliveries by status

``serve``, ``migrate`` and ``keygen`` come from the server distribution when
it is installed beside the client (entry points, see ``_plugins``).

Each client command talks to the server that ``sendtime serve`` would start
with the same settings: --config FILE (default $SENDTIME_CONFIG) and the
SENDTIME_* variables (SENDTIME_GRPC__PORT=6000) give its gRPC address, and TLS
when [grpc.tls] is set. --target HOST:PORT (default $SENDTIME_TARGET) names a
server outright; with the client alone, that is how it finds one. The key is
--api-key (default $SENDTIME_API_KEY, else the development key, when the
config accepts it). When nothing listens at the address the command says so
at once, naming where the address came from.

Output is readable by default and one JSON object with --json; with --json an
error is one JSON object on stderr and stdout stays empty. Exit status: 0 on
success, 1 when the server refuses or cannot be reached (or preview finds no
Chromium, or ``send --wait`` ends in anything but sent), 2 for bad arguments.
"""

from sendtime.cli._main import build_parser, main
from sendtime.cli._plugins import ServerSettings, Subcommands

__all__ = ["ServerSettings", "Subcommands", "build_parser", "main"]
