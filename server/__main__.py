from lora_server.cli import main

main()
