"""The core: backbone, task folder, merged graph, tokens, answers, overhead. Imports only errors and io."""
