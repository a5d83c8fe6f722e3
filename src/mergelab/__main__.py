from ._startup import quiet_interrupt

with quiet_interrupt():
    from .cli import main

main(prog_name="mergelab")
