from klong.cli import run

if __name__ == "__main__":  # guarded: the sink's worker process re-imports the main module (spawn)
    run()
