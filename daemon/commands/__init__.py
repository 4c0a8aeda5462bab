"""The command line: ``inboxd`` and its subcommands (run, status, retry, push, check,
demo, sandbox, completion, install-files). May use every stage."""
