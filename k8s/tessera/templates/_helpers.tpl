{{/*
The chart's name, or nameOverride; at most 63 characters (a DNS label).
*/}}
{{- define "tessera.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Name of the release's objects: fullnameOverride, else "<release>-<name>", or just the
release name when it already contains the chart's name.
*/}}
{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "tessera.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Labels that select the pods (never change them after the first install).
*/}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels of every object.
*/}}
{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tessera.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "tessera.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
The image: repository:tag, the tag defaulting to "<appVersion>-cpu" or "-cuda".
*/}}
{{- define "tessera.image" -}}
{{- $flavour := ternary "cuda" "cpu" .Values.gpu.enabled -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavour) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/*
The device: .Values.device, else cuda with GPUs and cpu without.
*/}}
{{- define "tessera.device" -}}
{{- .Values.device | default (ternary "cuda" "cpu" .Values.gpu.enabled) -}}
{{- end -}}

{{/*
GPUs of one pod: one per shard rank of every group.
*/}}
{{- define "tessera.gpuCount" -}}
{{- mul (int .Values.numShard) (int .Values.replicas) -}}
{{- end -}}

{{/*
Container resources: .Values.resources, plus the GPUs in requests and limits.
*/}}
{{- define "tessera.resources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) -}}
{{- if .Values.gpu.enabled -}}
{{- $gpus := include "tessera.gpuCount" . | int -}}
{{- $limits := $resources.limits | default dict -}}
{{- $requests := $resources.requests | default dict -}}
{{- $_ := set $limits .Values.gpu.resourceName $gpus -}}
{{- $_ := set $requests .Values.gpu.resourceName $gpus -}}
{{- $_ := set $resources "limits" $limits -}}
{{- $_ := set $resources "requests" $requests -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
Name of the model cache's claim, for the types that use one.
*/}}
{{- define "tessera.modelClaim" -}}
{{- if eq .Values.modelCache.type "existingClaim" -}}
{{- required "modelCache.existingClaim is required with modelCache.type existingClaim" .Values.modelCache.existingClaim -}}
{{- else -}}
{{- printf "%s-models" (include "tessera.fullname" .) -}}
{{- end -}}
{{- end -}}
