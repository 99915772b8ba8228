from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("images", "request_id", "neighbors")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    request_id: str
    neighbors: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., request_id: _Optional[str] = ..., neighbors: _Optional[int] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("row", "class_index", "label", "similarity", "source", "source_index")
    ROW_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    row: int
    class_index: int
    label: str
    similarity: float
    source: str
    source_index: int
    def __init__(self, row: _Optional[int] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., similarity: _Optional[float] = ..., source: _Optional[str] = ..., source_index: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("id", "score", "is_ood", "error", "predicted_class", "predicted_label", "neighbors")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IS_OOD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    is_ood: bool
    error: str
    predicted_class: int
    predicted_label: str
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., is_ood: _Optional[bool] = ..., error: _Optional[str] = ..., predicted_class: _Optional[int] = ..., predicted_label: _Optional[str] = ..., neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "model_version", "request_id", "error_code", "error")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    model_version: str
    request_id: str
    error_code: int
    error: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "threshold", "k", "class_names", "input_size", "resize", "providers", "device", "max_images", "max_message_bytes", "max_pixels", "max_batch", "scorer")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    threshold: float
    k: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input_size: int
    resize: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    device: str
    max_images: int
    max_message_bytes: int
    max_pixels: int
    max_batch: int
    scorer: ScorerInfo
    def __init__(self, model_version: _Optional[str] = ..., threshold: _Optional[float] = ..., k: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., input_size: _Optional[int] = ..., resize: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., max_images: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_batch: _Optional[int] = ..., scorer: _Optional[_Union[ScorerInfo, _Mapping]] = ...) -> None: ...

class ScorerInfo(_message.Message):
    __slots__ = ("scorer", "kind", "type", "factory", "rows", "bytes", "search_params", "device", "float16", "queries", "short_queries")
    class SearchParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SCORER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FLOAT16_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    SHORT_QUERIES_FIELD_NUMBER: _ClassVar[int]
    scorer: str
    kind: str
    type: str
    factory: str
    rows: int
    bytes: int
    search_params: _containers.ScalarMap[str, int]
    device: str
    float16: bool
    queries: int
    short_queries: int
    def __init__(self, scorer: _Optional[str] = ..., kind: _Optional[str] = ..., type: _Optional[str] = ..., factory: _Optional[str] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ..., search_params: _Optional[_Mapping[str, int]] = ..., device: _Optional[str] = ..., float16: _Optional[bool] = ..., queries: _Optional[int] = ..., short_queries: _Optional[int] = ...) -> None: ...
