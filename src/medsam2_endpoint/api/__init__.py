"""Adapters: Azure /score and batch, the samapi server, the command line. Transport in, Service call, transport out."""
