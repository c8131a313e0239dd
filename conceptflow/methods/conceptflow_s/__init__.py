"""ConceptFlow-S (§4.1): KronA-WED UNet adapter, disentangled learning, attention regularisation."""

from conceptflow.methods.base import MethodSpec
from conceptflow.methods.conceptflow_s.config import ConceptFlowSTrainConfig

SPEC = MethodSpec(
    name="conceptflow_s",
    config=ConceptFlowSTrainConfig,
    trainer="conceptflow.methods.conceptflow_s.trainer:ConceptFlowSMethod",
    reader="conceptflow.methods.conceptflow_s.reader:read_conceptflow_s",
    # Each (concept folder, out path) -> path; what loads each: their docstrings.
    exporters={"lycoris": "conceptflow.methods.conceptflow_s.lycoris:export_lycoris_concept",
               "diff": "conceptflow.methods.conceptflow_s.full_diff:export_diff_concept",
               "lycoris-rows": "conceptflow.methods.conceptflow_s.lycoris:export_lycoris_rows_concept"},
    summary="ConceptFlow-S: KronA-WED adapter, disentangled learning, attention regularisation",
)
