#!/usr/bin/env python3
"""A TLS-terminating reverse proxy with HTTP basic auth, in front of a real schema registry.

Usage: tls_auth_proxy.py <cert.pem> <key.pem> <user> <password> <upstream base URL>

Listens on 127.0.0.1 on a free port, prints the port on stdout (one line), then serves until
killed: every request with the right `Authorization: Basic` header is forwarded to the upstream
registry unchanged (method, path, body, content type) and its answer returned; any other gets
401. The interop test uses it to check Ferry's registry client against TLS with a private CA
and credentials, the way a hosted registry asks for them.
"""
import base64
import http.server
import ssl
import sys
import urllib.error
import urllib.request

cert, key, user, password, upstream = sys.argv[1:6]
expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Proxy(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def forward(self):
        if self.headers.get("Authorization") != expected:
            body = b'{"error_code":401,"message":"Unauthorized"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else None
        req = urllib.request.Request(upstream.rstrip("/") + self.path, data=data, method=self.command)
        for h in ("Content-Type", "Accept"):
            if self.headers.get(h):
                req.add_header(h, self.headers[h])
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = forward
    do_POST = forward


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
