from recipes.cli import close_process_group, main
from recipes.errors import run_main

run_main(main)
close_process_group()
