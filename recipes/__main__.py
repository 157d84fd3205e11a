from recipes.cli import main
from recipes.errors import run_main

run_main(main)
