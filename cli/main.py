import click

@click.group()
def main():
    """splitrelay."""
