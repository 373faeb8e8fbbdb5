from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("inputs", "tasks", "max_labels", "top_k", "raw_scores", "head", "request_id")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_LABELS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    max_labels: int
    top_k: int
    raw_scores: bool
    head: str
    request_id: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., tasks: _Optional[_Iterable[str]] = ..., max_labels: _Optional[int] = ..., top_k: _Optional[int] = ..., raw_scores: _Optional[bool] = ..., head: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("text", "text_pair", "id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    text_pair: str
    id: str
    def __init__(self, text: _Optional[str] = ..., text_pair: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "model_version", "model_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[InputResult]
    model_version: str
    model_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[InputResult, _Mapping]]] = ..., model_version: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class InputResult(_message.Message):
    __slots__ = ("id", "tasks")
    ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    id: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskResult]
    def __init__(self, id: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskResult, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task", "label", "labels", "value", "scores", "truncated", "top", "head")
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    task: str
    label: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    value: float
    scores: _containers.RepeatedScalarFieldContainer[float]
    truncated: bool
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    head: str
    def __init__(self, task: _Optional[str] = ..., label: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., value: _Optional[float] = ..., scores: _Optional[_Iterable[float]] = ..., truncated: _Optional[bool] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., head: _Optional[str] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "kind", "labels", "input", "max_length", "attach_layer", "task_layers", "has_candidate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ATTACH_LAYER_FIELD_NUMBER: _ClassVar[int]
    TASK_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HAS_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input: str
    max_length: int
    attach_layer: int
    task_layers: int
    has_candidate: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input: _Optional[str] = ..., max_length: _Optional[int] = ..., attach_layer: _Optional[int] = ..., task_layers: _Optional[int] = ..., has_candidate: _Optional[bool] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "backbone_id", "backbone_fingerprint", "model_version", "overhead_layers", "model_id")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    backbone_id: str
    backbone_fingerprint: str
    model_version: str
    overhead_layers: int
    model_id: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ..., backbone_id: _Optional[str] = ..., backbone_fingerprint: _Optional[str] = ..., model_version: _Optional[str] = ..., overhead_layers: _Optional[int] = ..., model_id: _Optional[str] = ...) -> None: ...
