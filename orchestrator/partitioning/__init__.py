"""Everything about partitions: the actors that compute them (``actor``), the trainers' schedule that requests and
adopts them (``schedule``), their MLflow view (``report``, ``heatmaps``) and their table form (``table``)."""
