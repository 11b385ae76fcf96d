"""Everything about partitions, the first side job (``orchestrator.side_jobs``): the actors that compute them
(``actor``), the trainers' schedule that requests and adopts them (``schedule``), their MLflow view (``report``,
``heatmaps``), their table form (``table``), and the kind that starts, builds and checks it (``side_job``)."""
