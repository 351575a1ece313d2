"""`splitrelay token`: mint the short-lived offer tokens a transceiver with --whip-key-file accepts."""

from __future__ import annotations

import time

import click
from splitrelay.cli.common import emit


@click.group()
def token() -> None:
    """Offer tokens for WHIP (HS256 JWTs, as an app backend issues them; splitrelay/tokens.py)."""


@token.command("mint")
@click.option("--key-file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The key the transceivers were given with --whip-key-file (at least 32 bytes).")
@click.option("--audience", required=True, metavar="POOL", help="The transceivers' --whip-audience.")
@click.option("--ttl", default=60.0, show_default=True, type=click.FloatRange(1, 86400), metavar="S",
              help="Seconds the token may be used to make an offer.")
@click.option("--max-call", default=3600.0, show_default=True, type=click.FloatRange(1, 7 * 86400), metavar="S",
              help="The longest call the token may open, in seconds: the transceiver ends it then.")
@click.option("--json", "as_json", is_flag=True, help="Print {token, audience, expires_at, max_call_s}.")
def token_mint(key_file: str, audience: str, ttl: float, max_call: float, as_json: bool) -> None:
    """Print a token good for --ttl seconds, for the pool --audience, for calls up to --max-call seconds.

    \b
    Example:
      splitrelay token mint --key-file /etc/splitrelay/whip.key --audience eu-1 --ttl 60 --max-call 600
      curl -H "Authorization: Bearer $(splitrelay token mint ...)" -H 'Content-Type: application/sdp' ...
    """
    from splitrelay import tokens

    now = time.time()
    max_call_s = int(max_call) if max_call.is_integer() else max_call
    minted = tokens.mint(tokens.load_key(key_file), audience, ttl, max_call_s, now=now)
    emit({"token": minted, "audience": audience, "expires_at": int(now) + int(ttl), "max_call_s": max_call_s},
         as_json, lambda data: click.echo(data["token"]))
