from akosha_sync.cli import run

run()
