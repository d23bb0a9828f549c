from .cli.app import app

if __name__ == "__main__":  # `python -m ditctl`; importing this module starts nothing
    app(prog_name="ditctl")
