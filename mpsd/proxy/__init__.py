"""The OpenAI front door: a lean HTTP/1.1 server that leases the least-loaded engine and relays."""
