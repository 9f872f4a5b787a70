"""Run fedcoord on several machines: certificates, node keys, SuperLink, SuperNodes.

``python -m deploy --help`` lists the subcommands; README.md ("Run on several
machines") walks through a three-machine deployment.
"""
