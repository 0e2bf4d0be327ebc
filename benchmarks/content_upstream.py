"""A slow upstream content provider for the content benchmark's phase (d).

An aiohttp server on loopback: ``GET /loyalty/{user_id}`` sleeps --delay
seconds, then answers a small JSON object for that user. ``GET /stats`` answers
at once with how many loyalty requests came in, were answered, and were given
up by the caller (the connection closed while sleeping), so the benchmark can
show how many upstream calls sendtime made under load.

    python -m benchmarks.content_upstream [--port 0] [--delay 1.0]

prints "upstream serving HTTP on http://HOST:PORT" when ready; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import web

_STATS = web.AppKey("stats", dict[str, int])
_DELAY = web.AppKey("delay", float)


async def loyalty(request: web.Request) -> web.Response:
    stats = request.app[_STATS]
    stats["requests"] += 1
    try:
        await asyncio.sleep(request.app[_DELAY])
    except asyncio.CancelledError:
        stats["abandoned"] += 1
        raise
    stats["answered"] += 1
    user_id = request.match_info["user_id"]
    return web.json_response({"user_id": user_id, "tier": "gold", "points": 1234})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATS])


async def _serve(host: str, port: int, delay: float) -> None:
    app = web.Application()
    app[_STATS] = {"requests": 0, "answered": 0, "abandoned": 0}
    app[_DELAY] = delay
    app.router.add_get("/loyalty/{user_id}", loyalty)
    app.router.add_get("/stats", stats)
    # cancel a handler whose client went away, so "abandoned" counts them
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"upstream serving HTTP on http://{host}:{bound} (delay {delay:g} s)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds to sleep before answering")
    args = parser.parse_args()
    uvloop.run(_serve(args.host, args.port, args.delay))


if __name__ == "__main__":
    main()
