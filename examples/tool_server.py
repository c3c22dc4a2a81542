#!/usr/bin/env python3
"""A tool server that serves one tenant and asks agent-guard who is calling.

For every connection it accepts, it runs

    agent-guard whois --peer IP:PORT --local IP:PORT --json

and answers the caller with one line:

    allow tenant=acme agent=researcher subject=acme/researcher pid=1234 on_behalf_of=alice@example.com
    refuse <why>

A connection from an untagged process, from another tenant's agent, or one
the daemon cannot place is refused. The answer comes from the kernel (the
socket cookie the connect program recorded), not from anything the caller
sends, so a prompt-injected agent cannot claim to be someone else.

Usage:
    tool_server.py --tenant acme --listen 127.0.0.1:8443 [--socket PATH] [--once N]

Run it as root or as a member of the daemon's --control-group. Each verdict
is also printed on stdout, one line per connection.
"""

import argparse
import json
import socket
import subprocess
import sys


def whois(agent_guard, sock_path, peer, local):
    """The daemon's answer for a connection, or None when it cannot say."""
    cmd = [agent_guard, "whois", "--peer", peer, "--local", local, "--json"]
    if sock_path:
        cmd += ["--socket", sock_path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    # Exit 0: a tagged agent; 3: not one; anything else: an error.
    if out.returncode not in (0, 3):
        return None, out.stderr.strip() or f"whois exited {out.returncode}"
    return json.loads(out.stdout), None


def fmt(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verdict(answer, error, tenant):
    if answer is None:
        return f"refuse cannot identify the caller: {error}"
    if not answer.get("tagged"):
        return f"refuse not an agent: {answer.get('why', 'untagged')}"
    if answer.get("tenant") != tenant:
        return f"refuse caller is tenant {answer.get('tenant')!r}, this server serves {tenant!r}"
    return (
        f"allow tenant={answer['tenant']} agent={answer['agent']} "
        f"subject={answer['subject']} pid={answer['pid']} "
        f"on_behalf_of={answer.get('on_behalf_of') or '-'}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenant", required=True, help="the one tenant this server serves")
    p.add_argument("--listen", default="127.0.0.1:8443", help="IP:PORT to listen on (port 0: any)")
    p.add_argument("--socket", help="agent-guard control socket (default: the daemon's default)")
    p.add_argument("--agent-guard", default="agent-guard", help="path of the agent-guard binary")
    p.add_argument("--once", type=int, default=0, help="exit after N connections (0: never)")
    a = p.parse_args()

    host, _, port = a.listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(16)
    print(f"listening {fmt(srv.getsockname())}", flush=True)
    served = 0
    while a.once == 0 or served < a.once:
        conn, peer = srv.accept()
        with conn:
            local = conn.getsockname()
            answer, error = whois(a.agent_guard, a.socket, fmt(peer), fmt(local))
            line = verdict(answer, error, a.tenant)
            print(line, flush=True)
            try:
                conn.sendall((line + "\n").encode())
            except OSError:
                pass
        served += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
