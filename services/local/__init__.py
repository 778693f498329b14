"""What runs in the user's own process: the `histream` CLI (cli.py), in-process generation
without Ray (generate.py), starting the service on a local Ray (server.py), and a small HTTP
client of the video API (client.py)."""
